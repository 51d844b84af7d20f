"""The key/value cache and the attention mask that goes with it.

Why a cache
-----------
A causal decoder computes, in every layer, keys and values for every position:

    K = X W_k,   V = X W_v,   Attention(q_t) = softmax(q_t K^T / sqrt(d)) V

Because attention is causal, the key and value of position j never change once
position j has been seen: later tokens cannot influence earlier ones. So when we
generate token t+1 we only need q, k, v for the *new* position; the keys and
values of positions 0..t can be kept from the previous step. That is the KV cache.
Generation then costs one "prefill" pass over the prompt (all positions at once,
filling the cache) and one cheap pass per new token (a single position that
attends to everything cached), instead of re-running the whole sequence every step:
O(T) work per token instead of O(T^2).

Keys are stored *after* RoPE is applied (a rotated key depends only on its own
position, so it never needs re-rotating) and *before* grouped-query heads are
repeated (the cache holds num_key_value_heads heads, which is the whole point of
GQA: a smaller cache).

The mask
--------
`scaled_dot_product_attention` takes a boolean mask, True = may attend. Query i
(absolute position past + i) may attend key j when

    j <= past + i                       causal: no peeking at the future
    attention_mask[b, j] == 1           key j is a real token, not padding
    (past + i) - j < sliding_window     only for sliding-window layers (Mistral)

`attention_mask` is the usual 2-D (batch, past + new) tensor of ones and zeros
covering the cached positions *and* the new ones, so left padding, right padding
and padding in the middle all work the same way.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values, each (batch, kv_heads, seq, head_dim).

    New entries are concatenated on, which keeps the class tiny and autograd-safe
    (no in-place writes into tensors an earlier step may have saved for backward).
    The copy per step is small next to reading the model's weights.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []

    @property
    def seq_length(self) -> int:
        """How many positions are cached (the same for every layer)."""
        if not self.keys or self.keys[0] is None:
            return 0
        return self.keys[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v for one layer; return everything cached so far."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def __len__(self) -> int:
        return len(self.keys)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    past_len: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean (batch or 1, 1, q_len, past_len + q_len) mask for SDPA, True = attend.

    Returns None when SDPA's own `is_causal=True` (no past) or no mask at all (a
    single new query sees every cached key) is exact; the attention layers use
    `is_causal = mask is None and q_len > 1`. That fast path lets SDPA pick its
    flash / memory-efficient kernels.
    """
    k_len = past_len + q_len
    window_bites = sliding_window is not None and k_len > sliding_window
    if attention_mask is not None and past_len == 0 and not window_bites and bool(attention_mask.all()):
        # Nothing is padded: SDPA's is_causal is exact, faster, and stores no mask.
        attention_mask = None
    if attention_mask is None and not window_bites and (past_len == 0 or q_len == 1):
        return None
    if attention_mask is not None and attention_mask.shape[-1] != k_len:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns but the keys span {k_len} positions "
            f"({past_len} cached + {q_len} new). Pass a mask covering the cached tokens too "
            "(append a column of ones per generated token)."
        )
    q_pos = torch.arange(past_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None]  # (1, q, k)
    if attention_mask is not None:
        # A left-pad query may attend to nothing at all. PyTorch's SDPA (>= 2.5, every
        # backend) returns zeros for such rows rather than NaN, and transformers relies
        # on the same, so pad positions come out identical to the reference.
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    return allowed[:, None]  # (batch, 1 head, q, k): broadcasts over heads


def start_forward(model, input_ids, inputs_embeds, kv_cache, use_cache) -> tuple["KVCache | None", int, bool]:
    """The decoder forward's shared first steps: (cache to use, its length, whether to
    checkpoint layers). Checkpointing re-runs each layer in backward, which would
    append to the cache twice, so the two cannot be combined."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if use_cache and kv_cache is None:
        kv_cache = KVCache()
    checkpointing = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    if checkpointing and kv_cache is not None:
        raise ValueError(
            "Gradient checkpointing re-runs each layer in backward, which would append to the "
            "KV cache twice. Pass use_cache=False (and no kv_cache) while training."
        )
    return kv_cache, (kv_cache.seq_length if kv_cache is not None else 0), checkpointing
