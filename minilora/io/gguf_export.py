"""`minilora export-gguf`: a model folder (and its adapter) as a GGUF file llama.cpp runs.

Two exports:

  * the merged model: the adapter is added into the base weights, W = W0 + s·BA with
    s = alpha/r (alpha/√r for rsLoRA), in fp32, and every tensor is written in the
    requested type. An NF4 base is dequantized to fp32 first: the merged weight is
    W0's 4-bit value plus the update, not a re-quantized copy.
  * `lora_only`: the adapter alone, as llama.cpp's LoRA adapter (`general.type =
    "adapter"`, tensors `<weight>.lora_a` / `.lora_b`). llama.cpp adds
    scale·(alpha/r)·B(Ax) with r read from lora_b and one alpha for the whole file, so
    each B is written pre-multiplied by s_layer / (alpha/r_layer): 1 when every layer
    has the same r and alpha, and the way rsLoRA, rank_pattern and alpha_pattern keep
    their own scales.

Tensor types (`out_type`): f32; f16 and bf16 for matrices (vectors such as norms and
biases stay f32, as llama.cpp's converter keeps them); q8_0 for matrices whose rows are
a multiple of 32, f16 for the others.

Beside the file a Modelfile for ollama names it (FROM, and ADAPTER for a LoRA file).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..lora.adapters import load_adapter, read_raw_config
from ..lora.inject import lora_layers, remove_lora
from .atomic import atomic_write_text
from .export import export_state_dict
from .gguf import BF16, F16, F32, FLOAT32, INT32, Q8_0, STRING
from .gguf_arch import ExportError, GGUFArch, gguf_arch
from .gguf_vocab import read_vocab
from .gguf_write import Q8_0_BLOCK, GGUFWriter, q8_0_bytes
from .loading import find_model_dir, load_model

OUT_TYPES = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0}
# llama.cpp's general.file_type (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16).
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
_TORCH = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
_ELEM = {"string[]": STRING, "int32[]": INT32, "float32[]": FLOAT32}


def _add_metadata(writer: GGUFWriter, keys) -> None:
    for key, kind, value in keys:
        if kind.endswith("[]"):
            writer.add_array(key, value, _ELEM[kind])
        else:
            getattr(writer, f"add_{kind}")(key, value)


def _raw(t: torch.Tensor, ggml_type: int) -> bytes:
    if ggml_type == Q8_0:
        return q8_0_bytes(t)
    return t.detach().to(_TORCH[ggml_type]).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _choose_type(t: torch.Tensor, out_type: str) -> int:
    if t.dim() < 2 or out_type == "f32":
        return F32
    if out_type == "q8_0":
        return Q8_0 if t.shape[-1] % Q8_0_BLOCK == 0 else F16
    return OUT_TYPES[out_type]


def _dequantize_nf4(model: nn.Module, log: Callable[[str], None]) -> None:
    """Swap every NF4Linear for an nn.Linear holding its fp32 dequantized weight."""
    from ..qlora.nf4_linear import NF4Linear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    if not layers:
        return
    log(f"the base is 4-bit NF4: {len(layers)} layers dequantized to fp32 before the merge")
    for name, layer in layers:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantize(torch.float32))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)


def _load(model_dir: Path, log) -> nn.Module:
    model = load_model(model_dir, task="causal-lm", dtype=torch.float32)
    _dequantize_nf4(model, log)
    return model


def _general(writer: GGUFWriter, arch: GGUFArch, name: str) -> None:
    writer.add_string("general.architecture", arch.name)
    writer.add_string("general.name", name)


def write_modelfile(gguf: Path, base: Path | None = None) -> Path:
    """An ollama Modelfile beside `gguf`: FROM the model, or, for an adapter, FROM its base
    (the HF folder, which ollama imports itself, or a GGUF of it) and ADAPTER the file."""
    if base is None:
        text = f"FROM ./{gguf.name}\n"
    else:
        text = f"FROM {base}\nADAPTER ./{gguf.name}\n"
    path = gguf.with_name(gguf.stem + ".Modelfile")
    atomic_write_text(path, text)
    return path


def export_gguf(model_dir, out, adapter=None, out_type: str = "f16", pre: str | None = None,
                log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Path:
    """Write `model_dir` (merged with `adapter`, if given) as a GGUF model at `out`."""
    if out_type not in OUT_TYPES:
        raise ExportError(f"--type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    model_dir, out = find_model_dir(model_dir), Path(out)
    model = _load(model_dir, log)
    arch = gguf_arch(model.config)
    vocab = read_vocab(model_dir, model.config.vocab_size, pre)  # before the merge: fail fast
    window = model.config.sliding_window
    if window is not None and window < model.config.max_position_embeddings:
        log(f"note: llama.cpp's {arch.name!r} graph has no sliding window; past {window} tokens it attends "
            f"further back than this model was trained to")
    if arch.name == "phi3" and vocab.model != "llama":
        raise ExportError(f"{model_dir}: a Phi-3-architecture model with a byte-level BPE tokenizer (Phi-4-mini's "
                          f"kind), which minilora does not export yet; Phi-3 and Phi-3.5 (SentencePiece) export")
    if arch.name == "phi3" and "<|endoftext|>" not in vocab.tokens:
        raise ExportError(f"{model_dir}: llama.cpp's phi3 graph looks up the token <|endoftext|>, which this "
                          f"tokenizer lacks; Phi-3 tokenizers have it (id 32000)")
    scaling = model.config.rope_scaling or {}
    if scaling.get("rope_type") == "longrope":
        log(f"note: llama.cpp uses LongRoPE's long factors at every position when its context (-c) is over "
            f"{scaling['original_max_position_embeddings']} tokens, and the short ones otherwise; transformers and "
            f"minilora switch by the length of the sequence")
    if adapter is not None:
        load_adapter(model, adapter)
        remove_lora(model, merge=True)

    writer = GGUFWriter(out)
    _general(writer, arch, model_dir.name)
    writer.add_uint32("general.file_type", _FILE_TYPE[out_type])
    if out_type == "q8_0":
        writer.add_uint32("general.quantization_version", 2)
    _add_metadata(writer, arch.hyperparameters())
    _add_metadata(writer, vocab.metadata())

    tensors = {arch.tensor_name(k): v for k, v in export_state_dict(model).items()}
    tensors.update(arch.extra_tensors())
    for name, t in tensors.items():
        ggml_type = _choose_type(t, out_type)
        if ggml_type == F16 and t.abs().max() > torch.finfo(torch.float16).max:
            raise ExportError(f"{name} holds values beyond float16's range (max {t.abs().max().item():.4g}); "
                              f"export with --type bf16 or f32")

        def make(name=name, t=t, ggml_type=ggml_type):
            return _raw(arch.to_file_layout(name, t), ggml_type)

        writer.add_tensor(name, tuple(t.shape), ggml_type, make)
    writer.write()
    write_modelfile(out)
    return out


def export_lora_gguf(model_dir, adapter, out,
                     log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Path:
    """Write the adapter in `adapter` (trained on `model_dir`) as a llama.cpp LoRA adapter at `out`."""
    model_dir, out = find_model_dir(model_dir), Path(out)
    raw = read_raw_config(adapter)
    if raw.get("use_dora"):
        raise ExportError(f"{adapter} is a DoRA adapter: llama.cpp's LoRA adapters have no magnitude vector; "
                          f"export the merged model instead (leave out --lora-only)")
    if raw.get("modules_to_save"):
        raise ExportError(f"{adapter} also trains whole modules (modules_to_save: {raw['modules_to_save']}), "
                          f"which a llama.cpp LoRA adapter cannot carry; export the merged model instead "
                          f"(leave out --lora-only)")
    model = _load(model_dir, log)
    arch = gguf_arch(model.config)
    load_adapter(model, adapter)

    layers = [(name, layer) for name, layer in lora_layers(model)]
    if not layers:
        raise ExportError(f"{adapter} holds no LoRA layers")
    alpha = layers[0][1].scaling * layers[0][1].r  # llama.cpp's scale is alpha / r
    writer = GGUFWriter(out)
    _general(writer, arch, f"{model_dir.name} LoRA adapter")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, layer in layers:
        weight = arch.tensor_name(name + ".weight")
        a = layer.lora_A.weight.detach().float()
        b = layer.lora_B.weight.detach().float() * (layer.scaling / (alpha / layer.r))
        if not math.isfinite(float(b.abs().max())):
            raise ExportError(f"{adapter}: the LoRA B of {name} holds values that are not finite")
        b = arch.to_file_layout(weight, b)
        writer.add_tensor(weight + ".lora_a", tuple(a.shape), F32, lambda a=a: _raw(a, F32))
        writer.add_tensor(weight + ".lora_b", tuple(b.shape), F32, lambda b=b: _raw(b, F32))
    writer.write()
    write_modelfile(out, base=model_dir.resolve())
    return out

