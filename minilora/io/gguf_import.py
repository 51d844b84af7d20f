"""Convert a llama-architecture GGUF file into a Hugging Face Llama folder.

The output folder is what `transformers.AutoModelForCausalLM.from_pretrained` and
`minilora.io.tokenizer.load_tokenizer` read:

    config.json              LlamaConfig fields, from the `llama.*` metadata
    model.safetensors        fp32 (or `dtype`) weights, HF names, (out, in) shapes
    tokenizer.json           byte-level BPE rebuilt with the `tokenizers` library
    tokenizer_config.json    special tokens, chat template, add_bos_token, ...
    generation_config.json   bos/eos/pad ids, so generation stops at <|im_end|>

Weights: GGUF names map to HF names (`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj`)
and GGUF dims (ne0, ne1) reverse to the PyTorch (out, in) shape. llama.cpp stores the
rows of Q and K permuted: HF's rotary embedding rotates the two *halves* of each head
(dims i and i + d/2 form a pair), llama.cpp's rotates *adjacent* pairs (2i, 2i+1), so
the converter interleaved the halves. Within a head, llama.cpp's rows are ordered
(pair i, half h) and HF's (half h, pair i): we view the rows as (head, d_head/2, 2)
and swap the last two axes.

Tokenizer: byte-level BPE (GPT-2 style) first maps every byte of the UTF-8 text to a
printable stand-in character (space becomes "Ġ"), so the vocabulary covers any input
without an unknown token. A pre-tokenizer splits text into word-like chunks (SmolLM2
first isolates every digit, then applies GPT-2's regex), and within each chunk the
merge list is applied greedily by rank: the merge "Ġ t" listed first fuses before any
later one. The GGUF stores exactly these pieces: `tokens` (id -> string), `merges`
(ranked "left right" pairs) and `token_type` (3 = control/special token).

Memory: tensors are dequantized and written one at a time by a small streaming
safetensors writer, so the peak is about one tensor, not the whole model.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from .atomic import atomic_write, atomic_write_text
from .gguf import GGUFError, GGUFReader
from .gguf_arch import LLAMA_LAYER, TOP
from .progress import Progress

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE; "llama" (SentencePiece) is not handled
# GGUF `tokenizer.ggml.pre` -> whether digits are split one by one before ByteLevel.
SUPPORTED_PRE_TOKENIZERS = {"smollm": True, "gpt2": False}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# SmolLM2's ChatML template, used only when the GGUF carries none of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GGUF tensor name -> HF module: the export's tables, read backwards.
_LAYER_NAMES = {gguf: hf for hf, gguf in LLAMA_LAYER.items()}
_TOP_NAMES = {gguf: hf for hf, gguf in TOP.items()}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, etc."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.weight"
    known = sorted(_TOP_NAMES) + [f"blk.N.{k}" for k in _LAYER_NAMES]
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; known names "
                    f"(each with .weight): {', '.join(known)}")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (see the module docstring)."""
    d, d_in = w.shape
    if d % (2 * n_head):
        raise GGUFError(f"Q/K weight with {d} rows cannot hold {n_head} heads of even size; "
                        f"check llama.attention.head_count(_kv)")
    return w.reshape(n_head, d // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d, d_in)


def _f32(x: float) -> float:
    # GGUF stores these as float32; the shortest float32 repr gives 1e-05, not 9.99999974e-06.
    return float(str(np.float32(x)))


def llama_config(meta: dict, dtype: torch.dtype, tied: bool) -> dict:
    """config.json for LlamaForCausalLM from GGUF `llama.*` and tokenizer metadata."""
    def need(key):
        if key not in meta:
            raise GGUFError(f"GGUF metadata lacks {key!r}, needed for config.json")
        return meta[key]

    def positive(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GGUFError(f"GGUF metadata {key} = {value!r}; it must be a positive integer")
        return value

    n_head = positive("llama.attention.head_count", need("llama.attention.head_count"))
    hidden = positive("llama.embedding_length", need("llama.embedding_length"))
    n_kv = positive("llama.attention.head_count_kv", meta.get("llama.attention.head_count_kv", n_head))
    if n_head % n_kv:
        raise GGUFError(f"GGUF metadata: llama.attention.head_count {n_head} is not a multiple of "
                        f"llama.attention.head_count_kv {n_kv}")
    for key in ("llama.block_count", "llama.feed_forward_length", "llama.context_length"):
        positive(key, need(key))
    eps = need("llama.attention.layer_norm_rms_epsilon")
    if not (isinstance(eps, float) and math.isfinite(eps) and eps > 0):
        raise GGUFError(f"GGUF metadata llama.attention.layer_norm_rms_epsilon = {eps!r}; it must be > 0 and finite")
    vocab = meta.get("llama.vocab_size") or len(need("tokenizer.ggml.tokens"))
    head_dim = meta.get("llama.attention.key_length") or hidden // n_head
    theta = _f32(meta.get("llama.rope.freq_base", 10000.0))
    if not (math.isfinite(theta) and theta > 1):
        raise GGUFError(f"GGUF metadata llama.rope.freq_base = {theta!r}; RoPE needs a finite base > 1")
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": need("llama.feed_forward_length"),
        "num_hidden_layers": need("llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rms_norm_eps": _f32(need("llama.attention.layer_norm_rms_epsilon")),
        "vocab_size": vocab,
        "max_position_embeddings": need("llama.context_length"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def build_tokenizer(meta: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` for the GGUF's byte-level BPE vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise GGUFError(f"tokenizer model {kind!r} is not supported; supported: "
                        f"{SUPPORTED_TOKENIZER_MODELS} (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise GGUFError(f"pre-tokenizer {pre!r} is not supported; supported: "
                        f"{sorted(SUPPORTED_PRE_TOKENIZERS)}. Its split regex would need adding here.")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFError("GGUF metadata lacks tokenizer.ggml.tokens (an array of strings)")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("tokenizer.ggml.tokens has duplicate entries; ids would be ambiguous")
    merges = []
    for m in meta.get("tokenizer.ggml.merges", []):
        pair = m.split(" ")
        if len(pair) != 2:  # byte-level tokens never contain a raw space
            raise GGUFError(f"merge {m!r} is not of the form 'left right'")
        missing = [t for t in (*pair, "".join(pair)) if t not in vocab]
        if missing:  # the tokenizers library would fail with an opaque error, or panic
            raise GGUFError(f"merge {m!r} names {missing[0]!r}, which is not in tokenizer.ggml.tokens")
        merges.append(tuple(pair))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if SUPPORTED_PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    # BOS/EOS insertion lives in tokenizer.json (transformers ignores add_bos_token in
    # tokenizer_config.json once a tokenizer.json exists), so GGUFs that ask for a BOS
    # (Llama-3 style) get a template; SmolLM2 adds none and only keeps ByteLevel offsets.
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)):
            raise GGUFError(f"GGUF metadata tokenizer.ggml.{key} = {i!r} is not an id in the vocabulary "
                            f"of {len(tokens)} tokens")
    if add_bos or add_eos:
        single = " ".join(([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"]
                          + ([f"{tokens[eos]}:0"] if add_eos else []))
        pair = single + " " + single.replace(":0", ":1").replace("$A", "$B")
        specials = [(tokens[i], i) for i, add in ((bos, add_bos), (eos, add_eos)) if add]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens must never be split by BPE nor produced from plain text by accident
    # of normalisation: registering them as special AddedTokens (their ids already exist
    # in the vocab, so ids do not move) makes the tokenizer match them whole.
    types = meta.get("tokenizer.ggml.token_type", [])
    special = [AddedToken(text, special=True, normalized=False)
               for text, t in zip(tokens, types) if t == TOKEN_TYPE_CONTROL]
    user = [AddedToken(text, special=False, normalized=False)
            for text, t in zip(tokens, types) if t == TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def tokenizer_config(meta: dict, tok: Tokenizer) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                      "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get("llama.context_length", 2048),
        "chat_template": meta.get("tokenizer.chat_template", DEFAULT_CHAT_TEMPLATE),
        "additional_special_tokens": [t for t in (bos, eos) if t],
        "added_tokens_decoder": added,
    }


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_safetensors(path: Path, plan: list, produce, dtype: torch.dtype, progress: bool = False) -> None:
    """Stream tensors into a safetensors file: header first, then each tensor's bytes.

    The format is an 8-byte little-endian header length, a JSON header mapping names
    to dtype/shape/[begin, end) byte ranges, then the raw bytes back to back. Since
    the GGUF tensor table gives every shape up front, the header can be written before
    any tensor is dequantized, and `produce(item)` yields one tensor at a time.
    """
    esize = torch.empty((), dtype=dtype).element_size()
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for hf_name, shape, _ in plan:
        n = int(np.prod(shape)) * esize
        header[hf_name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                           "data_offsets": [pos, pos + n]}
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # readers expect the data to start 8-byte aligned
    with atomic_write(path) as tmp, open(tmp, "wb") as f, \
            Progress(len(plan), "import", enabled=progress, unit="tensors") as bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for hf_name, shape, item in plan:
            bar.update(1)
            t = produce(item).to(dtype)
            if tuple(t.shape) != tuple(shape):
                raise GGUFError(f"{hf_name}: produced shape {tuple(t.shape)}, expected {shape}")
            if not torch.isfinite(t).all():  # NaN/inf scales or values: the model could only output NaN
                raise GGUFError(f"tensor {item!r} holds values that are not finite (as {dtype}); the file is damaged")
            f.write(_tensor_bytes(t))
            del t


def import_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32, progress: bool = False) -> Path:
    """Convert a llama GGUF file to an HF Llama folder at `out_dir`; returns its Path.

    `progress` reports the tensors written (a bar on a terminal, a few lines elsewhere).
    """
    if dtype not in _SAFETENSORS_DTYPE:
        raise ValueError(f"dtype {dtype} not supported; use one of {list(_SAFETENSORS_DTYPE)}")
    out = Path(out_dir)
    with GGUFReader(gguf_path) as reader:
        meta = reader.metadata
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{gguf_path}: architecture {arch!r} is not supported; "
                            f"supported: {SUPPORTED_ARCHITECTURES}")
        n_head = meta.get("llama.attention.head_count")
        n_kv = meta.get("llama.attention.head_count_kv", n_head)
        tied = "output.weight" not in reader.tensors
        config = llama_config(meta, dtype, tied)
        if "token_embd.weight" in reader.tensors:  # the weights, not the metadata, size the model
            config["vocab_size"] = reader.tensors["token_embd.weight"].shape[0]
        tok = build_tokenizer(meta)  # before any weight is written: fail fast on bad metadata
        required = ["token_embd.weight", "output_norm.weight"] + [
            f"blk.{i}.{part}.weight" for i in range(config["num_hidden_layers"]) for part in _LAYER_NAMES]
        missing = [name for name in required if name not in reader.tensors]
        if missing:  # a short tensor table (a lowered tensor_count) would write a folder that cannot load
            raise GGUFError(f"{gguf_path}: {len(missing)} of the model's tensors are missing (first: "
                            f"{', '.join(missing[:3])}); the file is truncated or not a complete llama model")

        # (hf_name, shape, gguf_name); Q/K keep their shape through the un-permute.
        plan = [(hf_tensor_name(name), info.shape, name) for name, info in reader.tensors.items()]
        plan.sort(key=lambda p: p[0])

        def produce(gguf_name: str) -> torch.Tensor:
            w = reader.tensor(gguf_name)
            if ".attn_q." in gguf_name:
                w = unpermute_qk(w, n_head)
            elif ".attn_k." in gguf_name:
                w = unpermute_qk(w, n_kv)
            return torch.from_numpy(np.ascontiguousarray(w))

        out.mkdir(parents=True, exist_ok=True)
        try:
            _write_safetensors(out / "model.safetensors", plan, produce, dtype, progress)
        except GGUFError as e:  # a tensor the reader cannot decode: name the file it is in
            raise GGUFError(f"{gguf_path}: {e}") from None

    # Each file replaces its old version only when complete (atomic_write); config.json
    # last, so a folder with the new config.json holds the new weights.
    def dump(name, obj):
        atomic_write_text(out / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    dump("generation_config.json", {k: config[k] for k in
                                    ("bos_token_id", "eos_token_id", "pad_token_id")})
    with atomic_write(out / "tokenizer.json") as tmp:
        tok.save(os.fspath(tmp))
    dump("tokenizer_config.json", tokenizer_config(meta, tok))
    dump("config.json", config)
    return out
