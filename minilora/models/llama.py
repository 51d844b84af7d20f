"""The Llama family of decoders: Llama 1/2/3, SmolLM, Mistral, Qwen2 and Qwen3.

All of them are the same pre-norm transformer; only a few switches differ
(biases, RoPE scaling, sliding windows). One block, applied num_hidden_layers times:

    h = x + Attention(RMSNorm(x))
    y = h + MLP(RMSNorm(h))

RMSNorm (Zhang & Sennrich, 2019) rescales by the root mean square only, with no
mean subtraction and no bias:

    RMSNorm(x) = x / sqrt(mean_i(x_i^2) + eps) * g           (g: learned, per channel)

RoPE, rotary position embedding (Su et al., 2021, "RoFormer", eq. 34). Split a
head vector into pairs and rotate pair i by the angle m * theta_i, where m is the
token's position and theta_i = base^(-2i/d):

    [x'_i      ]   [cos(m theta_i)  -sin(m theta_i)] [x_i      ]
    [x'_{i+d/2}] = [sin(m theta_i)   cos(m theta_i)] [x_{i+d/2}]

(Hugging Face pairs channel i with channel i + d/2 rather than 2i with 2i+1; the
checkpoints' q/k weights are permuted to match, so we pair the same way.)
Rotating q at position m and k at position n makes q.k depend only on m - n: the
attention score sees relative position for free, and nothing is added to x.
Llama 3.1 "llama3" scaling stretches long wavelengths for longer contexts: with
wavelength w_i = 2 pi / theta_i and L = original_max_position_embeddings,
    w_i < L / high_freq_factor:  theta_i unchanged          (fine detail, keep)
    w_i > L / low_freq_factor:   theta_i / factor           (coarse, stretch)
    otherwise: blend (1 - s) theta_i / factor + s theta_i,  s = (L / w_i - low) / (high - low)

GQA, grouped-query attention (Ainslie et al., 2023): num_key_value_heads < num_heads
key/value heads, each shared by a group of num_heads / num_key_value_heads query
heads. Same quality, a KV cache several times smaller.

SwiGLU MLP (Shazeer, 2020): a gated feed-forward layer,

    MLP(x) = W_down( silu(W_gate x) * (W_up x) ),    silu(z) = z * sigmoid(z)

Differences between members: Qwen2 has biases on q/k/v (not o); Mistral (and Qwen2
and Qwen3 with use_sliding_window) lets each token see only the last `sliding_window`
tokens, which we implement in the attention mask. Qwen3 drops Qwen2's biases and
normalises each head's query and key before RoPE (QK-norm, as in Dehghani et al., 2023):

    q_h = RMSNorm_q(W_q x)_h,    k_h = RMSNorm_k(W_k x)_h       (one gain of head_dim numbers each)

which keeps the attention logits q.k from growing with the weights' scale. Module names mirror the Hugging Face
checkpoints exactly, so `state_dict()` keys equal the keys in model.safetensors.

minilora.fast swaps in subclasses of the model (the loss without the logits) and of the
decoder layer (less work when gradient checkpointing runs it again); the forward here
is the plain computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .grad_checkpoint import checkpoint
from .kv_cache import KVCache, build_attention_mask, start_forward
from .lm_head import CausalLMOutput, causal_lm_head
from .rms_norm import RMSNorm

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: plain multi-head attention
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v_proj (Llama attention_bias, always on for Qwen2)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias; never for Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (Qwen3)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * this channels (Phi-4-mini: 0.75)
    attention_dropout: float = 0.0
    initializer_range: float = 0.02  # std for weights a checkpoint lacks
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention"
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # config.json keys we don't use

    model_types = SUPPORTED_MODEL_TYPES  # the model_type values this config class reads

    def __post_init__(self):
        if self.model_type not in self.model_types:
            raise ValueError(
                f"LlamaConfig does not support model_type {self.model_type!r}; "
                f"supported: {', '.join(self.model_types)}."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"Unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}. "
                    "Use a checkpoint without that scaling or add the formula to rope_inv_freq()."
                )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}.")
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """Read a Hugging Face config.json dict (old or transformers-5 layout).

        Missing keys take the defaults of the matching transformers config class,
        because save_pretrained may leave out keys that equal those defaults.
        """
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a Llama-family model; LlamaForCausalLM supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM, TinyLlama, Llama 3 are model_type 'llama')."
            )
        n_layers = d.get("num_hidden_layers", 32)
        # transformers 5 keeps rope_theta and scaling together in `rope_parameters`;
        # older files have top-level `rope_theta` plus `rope_scaling` (with "type" or "rope_type").
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise ValueError("Per-layer-type rope_parameters are not supported by LlamaForCausalLM.")
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope_scaling = None
        if rope_type in ("longrope", "su"):
            raise ValueError(f"rope type {rope_type!r} is read for Phi-3 (model_type 'phi3', models/phi3.py) only")
        if rope_type != "default":
            rope_scaling = {"rope_type": rope_type, **rope}
            if rope_type == "llama3":
                # transformers falls back to max_position_embeddings for this one key.
                rope_scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))

        sliding_window, layer_types = None, None
        if model_type == "mistral":
            sliding_window = d.get("sliding_window", 4096)
        elif model_type in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
            sliding_window = d.get("sliding_window", 4096)
            max_window_layers = d.get("max_window_layers", 28)
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(n_layers)
            ]
        # transformers' Qwen2 always has q/k/v biases; Mistral never has any (it ignores an
        # attention_bias key), and only Llama reads mlp_bias.
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))

        known = dict(
            vocab_size=d.get("vocab_size", {"llama": 32000, "mistral": 32000, "qwen2": 151936,
                                            "qwen3": 151936}[model_type]),
            hidden_size=d.get("hidden_size", 4096),
            intermediate_size=d.get("intermediate_size", 11008),
            num_hidden_layers=n_layers,
            num_attention_heads=d.get("num_attention_heads", 32),
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            hidden_act=d.get("hidden_act", "silu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            sliding_window=sliding_window,
            layer_types=layer_types,
            model_type=model_type,
        )
        return cls(**known, extra={k: v for k, v in d.items() if k not in known})


def rotary_dim(config: LlamaConfig) -> int:
    """How many channels of a head RoPE rotates (all of them unless partial_rotary_factor < 1)."""
    return int(config.head_dim * config.partial_rotary_factor)


def rope_inv_freq(config: LlamaConfig, long: bool = False) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i < d/2, then the rope_scaling rule, in fp32 on the CPU.

    longrope (Phi-3) divides each theta_i by a per-frequency factor, from `short_factor`
    while the sequence fits the pre-training length and from `long_factor` (long=True)
    beyond it."""
    dim = rotary_dim(config)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = config.rope_scaling
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * config.rope_theta ** exponents)
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if scaling is None:
        return inv_freq
    if rope_type == "linear":  # position interpolation: positions m become m / factor
        return inv_freq / scaling["factor"]
    # llama3: see the module docstring for the three wavelength bands.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    """cos and sin of m theta_i for each position m, scaled by `factor` (LongRoPE's), in `dtype`."""
    angles = position_ids[..., None].float() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)  # channel i and i + d/2 share an angle
    cos, sin = emb.cos(), emb.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos, sin: (batch or 1, seq, rotated channels).

    With partial rotary (fewer rotated channels than head_dim) the rest pass unrotated."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        x, rest = x[..., :rot], x[..., rot:]
        return torch.cat((x * cos[:, None] + rotate_half(x) * sin[:, None], rest), dim=-1)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class LlamaAttention(nn.Module):
    norm_class = RMSNorm  # of the per-head q/k norms (Qwen3); Gemma swaps in its own
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = self.norm_class(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.norm_class(self.head_dim, config.rms_norm_eps)

    def project(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (batch, seq, heads, head_dim)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = self.attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(head_dim) + mask) v, each (batch, heads, seq, head_dim)."""
        groups = self.n_heads // self.n_kv_heads
        # enable_gqa lets each kv head serve its `groups` query heads without copying K
        # and V to every head (a copy autograd would also keep for backward).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=groups > 1,
        )


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    attention_class, mlp_class = LlamaAttention, LlamaMLP  # Phi-3 swaps in its fused ones
    norm_class = RMSNorm  # Gemma swaps in its own

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_class(config, layer_idx)
        self.mlp = self.mlp_class(config)
        self.input_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    # Takes labels= and return_logits=False: the caller needs the loss only (lm_head.py).
    fused_lm_loss = True
    layer_class = LlamaDecoderLayer  # a family with another block (Phi-3) swaps this
    norm_class = RMSNorm  # the final norm (Gemma swaps in its own)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # A ModuleDict named `model` reproduces the checkpoint prefix "model." without
        # a wrapper class: model.embed_tokens, model.layers.N..., model.norm.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers)),
            norm=self.norm_class(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.checkpoint_every = 1  # with checkpointing on: layers 0, N, 2N, ... (grad_checkpoint.enable)
        # RoPE frequencies are a pure function of the config: kept out of the state
        # dict and out of meta-device construction, recomputed per device on demand.
        self._inv_freq: dict[tuple[torch.device, bool], torch.Tensor] = {}

    @property
    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self) -> None:
        """Make lm_head share the embedding Parameter (call again after load_state_dict(assign=True))."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Checkpoint keys already are our keys; only stale RoPE buffers are dropped."""
        if key.endswith("rotary_emb.inv_freq"):
            return None
        return key, tensor

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        self._inv_freq = {}
        self._rope_inv_freq(torch.device(device))

    def _rope_inv_freq(self, device: torch.device, long: bool = False) -> torch.Tensor:
        if (device, long) not in self._inv_freq:
            # Computed on the CPU in fp32 so every device rotates by bit-identical angles.
            self._inv_freq[device, long] = rope_inv_freq(self.config, long).to(device)
        return self._inv_freq[device, long]

    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        scaling = self.config.rope_scaling or {}
        long, factor = False, 1.0
        if scaling.get("rope_type") == "longrope":
            # The long factors once the sequence outgrows the pre-training length, as
            # transformers decides it: by the largest position in this call.
            long = int(position_ids.max()) + 1 > scaling["original_max_position_embeddings"]
            factor = scaling["attention_factor"]
        return rope_cos_sin(position_ids, self._rope_inv_freq(position_ids.device, long), dtype, factor)

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
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        if position_ids is None:
            # transformers' default: positions continue after the cache, padding or not.
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        cos, sin = self.rope_cos_sin(position_ids.to(x.device), x.dtype)
        full_mask = build_attention_mask(attention_mask, T, past, x.device)
        sliding_mask = None
        if self.config.sliding_window is not None and "sliding_attention" in self.config.layer_types:
            sliding_mask = build_attention_mask(attention_mask, T, past, x.device, self.config.sliding_window)

        for i, layer in enumerate(self.model.layers):
            mask = sliding_mask if layer.sliding else full_mask
            if checkpointing and i % self.checkpoint_every == 0:
                x = checkpoint(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        logits, loss, loss_sum = self.head(self.model.norm(x), labels, return_logits)
        return CausalLMOutput(loss=loss, logits=logits, kv_cache=kv_cache, loss_sum=loss_sum)

    def head(self, hidden: torch.Tensor, labels: torch.Tensor | None, return_logits: bool = True):
        """(logits, mean loss, summed loss) of the final hidden states; the logits are
        built for the loss anyway, so they are returned whatever return_logits says."""
        return causal_lm_head(self.lm_head, hidden, labels)
