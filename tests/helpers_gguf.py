"""Tiny model folders for the GGUF export tests: a transformers model saved with a small
byte-level BPE tokenizer, trained here on a slice of Tiny Shakespeare, whose
pre-tokenizer is one of the four minilora names for llama.cpp.

The pre-tokenizer pipelines are the ones the families' own tokenizer.json files hold:
GPT-2's ByteLevel regex, SmolLM2's digits-apart then ByteLevel, and a Split with the
Llama 3 or Qwen2 regex followed by ByteLevel without its own regex.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# Code, digits, accents, emoji, runs of spaces and newlines: where the pre-tokenizers differ.
MIXED_TEXT = ("def f(x):\n    return x**2 + 12345  # cost: 3.14159 €\n\n"
              "Café déjà vu, naïve façade — 🦙🚀 2024-12-06!!  \t  end")


def pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[pre]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_tokenizer(pre: str, vocab_size: int = 600) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)] + [MIXED_TEXT] * 3,
                            trainer=trainer)
    return tok


def train_spm_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """A SentencePiece-style tokenizer as HF folders of Llama 2 and Mistral hold it: spaces
    as "\u2581" and one put before the text (normalizers), BPE with byte_fallback (text
    outside the vocabulary becomes <0xXX> byte tokens), ids 0-2 for <unk>, <s>, </s> and
    3-258 for the bytes. Trained word by word, so no token spans two words."""
    from tokenizers import normalizers

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    spec = json.loads(tok.to_str())
    # The byte tokens belong to the model's vocabulary, not to the added (special) tokens.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials[:3]]
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return Tokenizer.from_str(json.dumps(spec))


def save_tokenizer(folder: Path, pre: str, add_bos: bool = False) -> None:
    if pre in ("spm", "spm_phi3"):
        tok = train_spm_tokenizer()
        if pre == "spm_phi3":  # Phi-3's chat tokens after the vocabulary (llama.cpp's phi3 needs <|endoftext|>)
            tok.add_special_tokens(["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>"])
        from tokenizers import processors
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "chat_template": CHATML}))
        return
    tok = train_tokenizer(pre)
    if add_bos:
        from tokenizers import processors
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "chat_template": CHATML}))


def tiny_folder(folder: Path, family: str, pre: str, seed: int = 0, add_bos: bool = False, vocab: int = 640,
                **overrides) -> Path:
    """A random `family` model (llama, qwen2, qwen3, mistral, phi3) saved by transformers, with a `pre` tokenizer
    (a llama.cpp pre-tokenizer name, or "spm" for a SentencePiece-style one with ids <unk> 0, <s> 1, </s> 2;
    "spm_phi3" adds Phi-3's <|endoftext|>, <|end|>, <|user|>, <|assistant|> as ids 600-603)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                  bos_token_id=0, eos_token_id=2, pad_token_id=2)
    common.update(overrides)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[family]
    model = model_class(config_class(**common))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, pre, add_bos=add_bos)
    return folder
