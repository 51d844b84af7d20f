"""Autoregressive text generation with a KV cache.

A causal LM gives, for the last position, logits z over the vocabulary. We turn
them into the next token, append it, and repeat. The decoding rules:

  greedy (temperature = 0):  next = argmax_i z_i
  temperature T > 0:         p_i = softmax(z / T)_i, next ~ p
                             T < 1 sharpens the distribution, T > 1 flattens it.
  top-k (Fan et al., 2018):  keep only the k largest z_i (others -> -inf), renormalise.
  top-p / nucleus (Holtzman et al., 2019): sort p descending and keep the smallest
                             prefix whose cumulative probability reaches p; sample
                             from that "nucleus". It adapts: a confident model keeps
                             one or two tokens, an unsure one keeps many.
  Applied in that order: temperature, top-k, top-p, then sample.

The KV cache (see minilora/models/kv_cache.py) makes this cheap: one prefill pass
runs the whole prompt and stores every layer's keys and values; each later step
feeds only the newest token, which attends to the stored keys/values, so a step
costs one token's worth of compute instead of re-running the whole sequence.

Batches of prompts of different lengths are left-padded (pads first, so every
row's last column is a real token and new tokens line up). Padding is handled by
the attention mask, and positions are counted over real tokens only,
position = cumsum(attention_mask) - 1, exactly as transformers' generate does, so
a padded prompt generates the same tokens as the same prompt alone. Right-padded
prompts also work: the first token is read from each row's last real position.

`adapter_names=[...]` (one per row, "base" for none) runs a batch in which every
row uses its own LoRA adapter (see inject.mixed_batch), in the prefill and in every
cached step, so each row generates what it would alone with its adapter active.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch

from ..lora.named_adapters import mixed_batch
from ..models.kv_cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: (batch, vocab)."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the most
        # likely token always survives (its preceding mass is 0).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from last-position logits (batch, vocab) -> (batch,)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _iter_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (batch,), once per step.

    Rows that have produced an end token keep yielding `pad_token_id` (default:
    the first end token) until every row is done, then the iterator stops.
    The caller puts the model in eval mode (see _eval_mode).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if max_new_tokens <= 0:
        return
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    device = _model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).long()
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    # Prefill: positions count real tokens only; pads get position 0 (never read).
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = KVCache()
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, kv_cache=cache, use_cache=True)
    cache = out.kv_cache
    # The last *real* token of each row (the last column when left-padded).
    cols = torch.arange(input_ids.shape[1], device=device)
    last = (cols * attention_mask).argmax(dim=-1)
    logits = out.logits[torch.arange(batch, device=device), last]
    next_pos = attention_mask.sum(-1, keepdim=True)

    switch = _long_rope_switch(model)
    for step in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        yield tok
        if eos:
            done = done | torch.isin(tok, eos_t)
            if bool(done.all()):
                return
        if step == max_new_tokens - 1:
            return  # the last token needs no forward pass
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        input_ids = torch.cat([input_ids, tok[:, None]], dim=1)
        if switch is not None and input_ids.shape[1] == switch + 1:
            # LongRoPE changes every frequency once the sequence outgrows the pre-training
            # length, and the cached keys were rotated with the short ones: run the whole
            # sequence again with the long ones, as transformers' Phi-3 generate does.
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, kv_cache=KVCache(),
                        use_cache=True)
            cache = out.kv_cache
        else:
            out = model(tok[:, None], attention_mask=attention_mask, position_ids=next_pos, kv_cache=cache)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1


def _long_rope_switch(model: torch.nn.Module) -> int | None:
    """The pre-training length of a LongRoPE model (where its RoPE switches to the long
    factors), or None."""
    scaling = getattr(getattr(model, "config", None), "rope_scaling", None) or {}
    return scaling.get("original_max_position_embeddings") if scaling.get("rope_type") == "longrope" else None


def _per_row_adapters(model: torch.nn.Module, adapter_names: Sequence[str] | None, rows: int):
    if adapter_names is None:
        return nullcontext()
    if isinstance(adapter_names, str) or len(adapter_names) != rows:
        raise ValueError(f"adapter_names must be a list with one adapter name per prompt ({rows}), got {adapter_names!r}")
    return mixed_batch(model, adapter_names)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Dropout must not randomise generation; restore the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    adapter_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Return (batch, prompt_len + new) ids: the prompt followed by the generated tokens.

    Like transformers' generate: prompts (left-padded for batches) are kept as given,
    and rows that finished early are filled with `pad_token_id` (default: eos).
    `adapter_names` gives each row its own adapter ("base" for none).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    with _eval_mode(model), _per_row_adapters(model, adapter_names, input_ids.shape[0]):
        new = list(_iter_tokens(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                                eos_token_id, pad_token_id, generator))
    prompt = input_ids.to(_model_device(model))
    if not new:
        return prompt
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: Sequence[str] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> str | list[str]:
    """Continue `prompt` (used as-is: apply a chat template first if you want one).

    Returns only the new text. Generation ends at the tokenizer's eos token, after
    max_new_tokens, or as soon as one of the `stop` strings appears; the stop string
    and anything after it are cut off. A list of prompts runs as one left-padded
    batch and returns a list; `adapter_names` then gives each prompt its adapter.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    encoded = [tokenizer.encode(p) for p in prompts]
    if not prompts or any(len(e) == 0 for e in encoded):
        raise ValueError("The prompt encodes to zero tokens; generation needs at least one.")
    stop = [s for s in (stop or []) if s]
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    width = max(len(e) for e in encoded)
    # Left padding: every row's last column is a real token (see the module docstring).
    ids = torch.tensor([[pad if pad is not None else (eos or 0)] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    new_ids: list[list[int]] = [[] for _ in prompts]
    texts: list[str | None] = [None] * len(prompts)
    with _eval_mode(model), _per_row_adapters(model, adapter_names, len(prompts)):
        steps = _iter_tokens(model, ids, mask, max_new_tokens, temperature, top_k, top_p, eos, pad)
        for tok in steps:
            for row, t in enumerate(tok.tolist()):
                if texts[row] is not None:
                    continue
                if t == eos:
                    texts[row] = tokenizer.decode(new_ids[row])
                    continue
                new_ids[row].append(t)
                if stop:
                    # Decode the whole continuation: a stop string may straddle tokens, and
                    # byte-level tokens only form valid text together.
                    text = tokenizer.decode(new_ids[row])
                    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
                    if hits:
                        texts[row] = text[: min(hits)]
            if all(t is not None for t in texts):
                steps.close()
                break
    texts = [t if t is not None else tokenizer.decode(n) for t, n in zip(texts, new_ids)]
    return texts[0] if single else texts
