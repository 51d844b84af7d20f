"""`quantize_folder`: a model folder in, a bitsandbytes 4-bit NF4 folder out, tensor by tensor.

What is quantized and why, and the format of the folder, are in quantize.py's docstring:
the same layers `load_model(..., quantize="nf4")` makes 4-bit, stored under the
checkpoint's own keys as transformers + bitsandbytes save them, so both load it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import atomic_write, atomic_write_text
from ..io.loading import _no_init, checkpoint_shards, find_model_dir, resolve_dtype
from ..io.progress import Progress
from ..io.safetensors_files import open_safetensors
from ..io.safetensors_stream import SafetensorsStream
from ..models import get_config_class, get_model_class, supported_tasks
from .nf4 import quantize_nf4
from .quantize import check_quantize_args, nf4_module_names

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _pick_task(model_type: str) -> str:
    tasks = supported_tasks(model_type)
    # The task whose model holds the most of the checkpoint: a causal LM's head, or the
    # bare encoder (a classifier in the checkpoint is then copied as it is, unquantized).
    for task in ("causal-lm", "embedding", "sequence-classification"):
        if task in tasks:
            return task
    return tasks[0]


def quantize_folder(in_dir, out_dir, blocksize: int = 64, double_quant: bool = True, compute_dtype=None,
                    progress: bool = False) -> Path:
    """Write `in_dir`'s model as a bitsandbytes NF4 folder in `out_dir`; return `out_dir`.

    Every linear layer of the transformer blocks is stored in 4 bits (the same bytes
    bitsandbytes' Linear4bit would make), under the checkpoint's own key names; all
    other tensors are copied, floating ones cast to `compute_dtype` when given (None:
    the checkpoint's dtype). One tensor is in memory at a time. config.json gets the
    `quantization_config` that transformers writes for BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", ...), listing the linear layers
    kept in full precision in `llm_int8_skip_modules`; tokenizer and generation files
    are copied. Every file is written to a temporary name and renamed into place.
    `progress` reports the tensors done (a bar on a terminal, a few lines elsewhere).
    """
    check_quantize_args("nf4", blocksize)
    model_dir = find_model_dir(in_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"quantize_folder would overwrite its input {model_dir}; choose another output folder")
    stale = sorted(p.name for p in out_dir.glob("*.safetensors*") if p.name != "model.safetensors") \
        if out_dir.is_dir() else []  # fmt: skip
    if stale:
        raise ValueError(f"{out_dir} already holds other weights ({', '.join(stale[:3])}), which loaders would "
                         "mix with the new file; choose an empty or new output folder")  # fmt: skip
    hf_config = json.loads((model_dir / "config.json").read_text())
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{model_dir} is already quantized (quant_method {method!r}); quantize_folder needs the "
                         "unquantized original")  # fmt: skip
    model_type = hf_config.get("model_type")
    if not model_type:
        raise ValueError(f"{model_dir / 'config.json'} has no model_type, so the architecture is unknown")
    compute = resolve_dtype(compute_dtype)
    if compute is not None and compute not in _DTYPE_NAMES:
        raise ValueError(f"compute_dtype must be one of {', '.join(_DTYPE_NAMES.values())} or None, got {compute}")
    model_cls = get_model_class(model_type, _pick_task(model_type))
    with torch.device("meta"), _no_init():
        model = model_cls(get_config_class(model_type).from_hf(hf_config))
    quantized = {name + ".weight" for name in nf4_module_names(model)}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = getattr(model, "get_output_embeddings", lambda: None)()
    skip = {name for name, m in model.named_modules() if out is not None and m is out}

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsStream(out_dir / "model.safetensors")
    seen_dtype = None
    n_quantized = 0
    shards = checkpoint_shards(model_dir)
    bar = Progress(sum(len(keys) for _, keys in shards), "quantize", enabled=progress, unit="tensors")
    try:
        for file, keys in shards:
            for key in keys:
                bar.update(1)
                with open_safetensors(file) as f:  # one short-lived mapping per tensor, as in loading
                    raw = f.get_tensor(key)
                    if raw.is_floating_point() and seen_dtype is None:
                        seen_dtype = raw.dtype
                    converted = model.convert_checkpoint_tensor(key, raw)
                    name = converted[0] if converted is not None else None
                    if name in quantized:
                        w = converted[1]
                        if w.dtype not in _DTYPE_NAMES:
                            raise TypeError(f"{key!r} is {w.dtype}; NF4 quantizes float32/float16/bfloat16 weights")
                        for k, t in quantize_nf4(w, blocksize, double_quant).to_bnb_state_dict(key).items():
                            writer.add(k, t)
                        n_quantized += 1
                        continue
                    module = (name or key).removesuffix(".weight")
                    if key.endswith(".weight") and raw.ndim == 2 and (module in linears or name is None):
                        # A linear kept in full precision (or a weight our model does not use): tell
                        # transformers not to build a 4-bit layer for it.
                        skip.add(key.removesuffix(".weight"))
                    cast = compute if compute is not None and raw.is_floating_point() else raw.dtype
                    writer.add(key, raw.to(cast))
        if n_quantized == 0:
            raise ValueError(f"{model_dir} has no linear layer inside its transformer blocks to quantize")
        writer.finish({"format": "pt"})
    finally:
        bar.close()
        writer.close()

    if compute is not None:  # the floating tensors were cast: say so where transformers looks
        hf_config["dtype"] = _DTYPE_NAMES.get(compute, str(compute).removeprefix("torch."))
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = hf_config["dtype"]
    compute = compute or seen_dtype or torch.float32
    # The keys and values transformers 5 writes for this BitsAndBytesConfig, in its order.
    hf_config["quantization_config"] = {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES.get(compute, "float32"),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": sorted(skip) or None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name != "config.json" and not path.name.endswith(_WEIGHT_SUFFIXES):
            with atomic_write(out_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)
    # config.json last: a folder with one is complete.
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return out_dir
