"""How an HF causal LM is spelled in GGUF: llama.cpp's architecture name, its
hyper-parameter keys, its tensor names, and the one layout change its RoPE needs.

llama.cpp builds the compute graph from `general.architecture` and reads the shape of
the model from keys under that name (`llama.block_count`, `qwen3.attention.head_count`,
...), so an exported file must use exactly its names:

    HF (model_type)            GGUF architecture   RoPE layout in the file
    llama, mistral             llama               adjacent pairs: Q/K rows permuted
    qwen2                      qwen2               halves (NEOX): as HF stores them
    qwen3                      qwen3               halves (NEOX): as HF stores them
    phi3                       phi3                halves (NEOX); fused qkv and gate_up kept fused

Rotary embeddings rotate pairs of channels in each head. HF's Llama code pairs channel
i with i + d/2 (the two halves of a head); llama.cpp's "llama" graph pairs 2i with
2i + 1. Both compute the same attention if the rows of W_q and W_k are reordered, within
each head, from (half h, pair i) to (pair i, half h):

    rows of one head, HF:       [x0 x1 ... x(d/2-1) | y0 y1 ... y(d/2-1)]
    rows of one head, llama:    [x0 y0 x1 y1 ... x(d/2-1) y(d/2-1)]

`permute_qk` does that, and the importer's `unpermute_qk` undoes it. The Qwen graphs
use the halves layout, so their rows are written as they are. The same permutation
applies to the rows of a LoRA B on q_proj or k_proj, since BA adds to those rows.

Llama 3.1's RoPE scaling divides each frequency by a factor that depends on its
wavelength; llama.cpp reads those factors from a `rope_freqs.weight` tensor, which is
computed here from minilora's own frequencies (plain / scaled), so both use one formula.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..models.llama import LlamaConfig, rope_inv_freq, rotary_dim

# HF model_type -> llama.cpp architecture name.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}

# HF module -> GGUF tensor name. A llama block's (the importer reads these back):
LLAMA_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LAYER = {**LLAMA_LAYER, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",  # Qwen3
          "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # Phi-3's fused layers
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


class ExportError(ValueError):
    """The model cannot be written as a GGUF file llama.cpp runs; the message says why and what to do."""


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of W_q / W_k (or of a LoRA B on them) from HF's halves layout to llama.cpp's pairs."""
    d = w.shape[0]
    if d % (2 * n_head):
        raise ExportError(f"a Q/K weight with {d} rows cannot hold {n_head} heads of even size")
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, 2, d // n_head // 2, *rest).transpose(1, 2).reshape(d, *rest)


@dataclass
class GGUFArch:
    """One model's GGUF spelling: its architecture name, its keys, and its tensor names."""

    name: str  # llama.cpp's architecture name
    config: LlamaConfig

    @property
    def permutes_qk(self) -> bool:
        return self.name == "llama"

    def tensor_name(self, hf_name: str) -> str:
        """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, etc."""
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
        if m and m.group(2) in _LAYER:
            return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
        m = re.fullmatch(r"(.+)\.(weight|bias)", hf_name)
        if m and m.group(1) in TOP:
            return f"{TOP[m.group(1)]}.{m.group(2)}"
        known = sorted(TOP) + [f"model.layers.N.{k}" for k in _LAYER]
        raise ExportError(f"tensor {hf_name!r} has no place in a GGUF {self.name!r} model; llama.cpp's graph "
                          f"knows these (each .weight, some .bias): {', '.join(known)}")

    def to_file_layout(self, gguf_name: str, w: torch.Tensor) -> torch.Tensor:
        """The rows of `w` (a weight, or a LoRA B) as llama.cpp's graph for this architecture reads them."""
        if not self.permutes_qk:
            return w
        if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", gguf_name):
            return permute_qk(w, self.config.num_attention_heads)
        if re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", gguf_name):
            return permute_qk(w, self.config.num_key_value_heads)
        return w

    def hyperparameters(self) -> list[tuple[str, str, object]]:
        """(key, type, value) for every `{arch}.*` key llama.cpp reads for this model."""
        c, a = self.config, self.name
        keys = [
            (f"{a}.context_length", "uint32", c.max_position_embeddings),
            (f"{a}.embedding_length", "uint32", c.hidden_size),
            (f"{a}.block_count", "uint32", c.num_hidden_layers),
            (f"{a}.feed_forward_length", "uint32", c.intermediate_size),
            (f"{a}.attention.head_count", "uint32", c.num_attention_heads),
            (f"{a}.attention.head_count_kv", "uint32", c.num_key_value_heads),
            (f"{a}.attention.layer_norm_rms_epsilon", "float32", c.rms_norm_eps),
            (f"{a}.rope.freq_base", "float32", c.rope_theta),
            (f"{a}.rope.dimension_count", "uint32", rotary_dim(c)),
            (f"{a}.attention.key_length", "uint32", c.head_dim),
            (f"{a}.attention.value_length", "uint32", c.head_dim),
            (f"{a}.vocab_size", "uint32", c.vocab_size),
        ]
        scaling = c.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "longrope":  # the factors themselves are tensors (extra_tensors)
            keys += [(f"{a}.rope.scaling.attn_factor", "float32", float(scaling["attention_factor"])),
                     (f"{a}.rope.scaling.original_context_length", "uint32",
                      int(scaling["original_max_position_embeddings"]))]
        if kind == "linear":
            keys += [(f"{a}.rope.scaling.type", "string", "linear"),
                     (f"{a}.rope.scaling.factor", "float32", float(scaling["factor"]))]
        return keys

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that the checkpoint does not hold (Llama 3.1's RoPE factors)."""
        scaling = self.config.rope_scaling or {}
        if scaling.get("rope_type") == "longrope":  # Phi-3: each frequency divided by its factor
            return {"rope_factors_long.weight": torch.tensor(scaling["long_factor"], dtype=torch.float32),
                    "rope_factors_short.weight": torch.tensor(scaling["short_factor"], dtype=torch.float32)}
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            return {}
        plain = rope_inv_freq(LlamaConfig(**{**self.config.__dict__, "rope_scaling": None}))
        return {"rope_freqs.weight": (plain / rope_inv_freq(self.config)).to(torch.float32)}


def gguf_arch(config: LlamaConfig) -> GGUFArch:
    """The GGUF spelling of a model minilora loaded, or an ExportError naming what is exportable."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES or not isinstance(config, LlamaConfig):
        raise ExportError(f"model_type {model_type!r} has no GGUF export in minilora; exportable: "
                          f"{', '.join(sorted(ARCHITECTURES))} (llama.cpp architectures "
                          f"{', '.join(sorted(set(ARCHITECTURES.values())))})")
    if config.partial_rotary_factor != 1.0 and model_type != "phi3":
        raise ExportError(f"{model_type} with partial_rotary_factor {config.partial_rotary_factor}: llama.cpp's "
                          f"{ARCHITECTURES[model_type]!r} graph rotates whole heads")
    # llama.cpp's llama graph takes a bias on any projection, qwen2's on q/k/v, qwen3's on none.
    if model_type == "qwen3" and (config.qkv_bias or config.o_bias or config.mlp_bias):
        raise ExportError("qwen3 with biases on its projections (attention_bias / mlp_bias): llama.cpp's "
                          "'qwen3' graph has no place for them")
    sliding = [t for t in config.layer_types if t == "sliding_attention"]
    if sliding and model_type != "mistral":
        raise ExportError(f"{model_type} with {len(sliding)} sliding-window layers: llama.cpp's "
                          f"{ARCHITECTURES[model_type]!r} graph attends to the whole context in every layer")
    return GGUFArch(ARCHITECTURES[model_type], config)
